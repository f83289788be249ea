"""The ``ring_hash`` balancer: consistent hashing of a request's hash key onto a ring of virtual nodes.

``RingHash`` keeps the ``pick`` contract in ``balancer.py`` (which builds it from ``build_balancer`` and re-exports it);
``hash_key_64`` and ``_ring_points`` are the two stable hashes it rests on: the key's position and the endpoints'
points, the same in every process and run, so replicas agree on where a key goes.

Pure: randomness (for a request without a hash key) comes from the injected ``random.Random``, time from ``now``.
"""

from __future__ import annotations

import hashlib
import math
import random
import struct
from bisect import bisect_left
from collections.abc import Sequence

from gateway.upstream.balancer_base import BalancerBase
from gateway.upstream.state import Endpoint

__all__ = ["DEFAULT_MAX_RING", "DEFAULT_VNODES_PER_WEIGHT", "RingHash", "hash_key_64"]

DEFAULT_VNODES_PER_WEIGHT = 256  # ring points per weight unit; ~6% spread of load between equal endpoints
DEFAULT_MAX_RING = 1 << 16  # ring points in total; past it the per-unit count shrinks (see RingHash)


def hash_key_64(key: str) -> int:
    """Stable 64-bit hash of a request's hash key: same value in every process and run (unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _ring_points(key: str, count: int) -> list[int]:
    """``count`` stable 64-bit ring points for an endpoint; a prefix of the points for any larger count.

    Ketama-style: one 64-byte BLAKE2b digest per block of 8 points, so building a ring costs count / 8 hashes.
    """
    points: list[int] = []
    block = 0
    while len(points) < count:
        digest = hashlib.blake2b(f"{key}#{block}".encode("utf-8", "surrogatepass"), digest_size=64).digest()
        points.extend(struct.unpack("<8Q", digest))
        block += 1
    del points[count:]
    return points


class RingHash(BalancerBase):
    """Consistent hashing on a ring of virtual nodes (ketama / Envoy ``RING_HASH``).

    Each endpoint owns ``weight / gcd(weights) * vnodes_per_weight`` points derived from its address alone, so
    adding or removing an endpoint only moves the keys that land on its points: no key moves between endpoints
    that stay. A key maps to the first point clockwise from its hash; an unusable or avoided owner passes the
    key on clockwise to the next owner, which is also where that key lands if the endpoint is removed.

    When ``sum(weight / gcd) * vnodes_per_weight`` would exceed ``max_ring``, the per-unit point count shrinks to
    fit; that scaling (and a change of the weights' gcd) changes every endpoint's point count, so in those cases
    some keys do move between remaining endpoints. ``hash_key`` None (no header/cookie) picks a random point:
    weighted random.
    """

    __slots__ = ("_distinct", "_hashes", "_max_ring", "_owners", "_vnodes_per_weight")

    def __init__(
        self,
        rng: random.Random,
        *,
        vnodes_per_weight: int = DEFAULT_VNODES_PER_WEIGHT,
        max_ring: int = DEFAULT_MAX_RING,
    ) -> None:
        super().__init__(rng)
        if vnodes_per_weight < 1 or max_ring < 1:
            raise ValueError("vnodes_per_weight and max_ring must be >= 1")
        self._vnodes_per_weight = vnodes_per_weight
        self._max_ring = max_ring
        self._hashes: list[int] = []
        self._owners: list[Endpoint] = []
        self._distinct = 0

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        self._endpoints = tuple(endpoints)
        if not self._endpoints:
            self._hashes, self._owners, self._distinct = [], [], 0
            return
        divisor = math.gcd(*(e.weight for e in self._endpoints))
        units = [e.weight // divisor for e in self._endpoints]
        per_unit = self._vnodes_per_weight
        if sum(units) * per_unit > self._max_ring:
            per_unit = max(1, self._max_ring // sum(units))
        ring: list[tuple[int, str, int]] = []
        for index, (endpoint, unit) in enumerate(zip(self._endpoints, units, strict=True)):
            # (point, key, index): a 64-bit collision still orders deterministically, by address.
            ring.extend((point, endpoint.key, index) for point in _ring_points(endpoint.key, unit * per_unit))
        ring.sort()
        self._hashes = [point for point, _, _ in ring]
        self._owners = [self._endpoints[index] for _, _, index in ring]
        self._distinct = len(self._endpoints)

    def pick(
        self, hash_key: str | None, now: float, avoid: Endpoint | None = None, *, panic: bool = False
    ) -> Endpoint | None:
        hashes = self._hashes
        size = len(hashes)
        if size == 0:
            return None
        if hash_key is None:
            index = self._rng.randrange(size)
        else:
            index = bisect_left(hashes, hash_key_64(hash_key))
            if index == size:
                index = 0  # past the last point: wrap to the first
        owner = self._owners[index]
        if owner is not avoid and owner.usable(now, panic):
            return owner
        return self._walk(index, avoid, now, panic)

    def _walk(self, index: int, avoid: Endpoint | None, now: float, panic: bool) -> Endpoint | None:
        """Clockwise from ``index`` to the next eligible owner; stops once every endpoint has been seen."""
        owners = self._owners
        size = len(owners)
        seen: set[int] = set()
        fallback: Endpoint | None = None
        for _ in range(size):
            owner = owners[index]
            if owner.usable(now, panic):
                if owner is not avoid:
                    return owner
                fallback = owner
            seen.add(id(owner))
            if len(seen) == self._distinct:
                break
            index += 1
            if index == size:
                index = 0
        return fallback
