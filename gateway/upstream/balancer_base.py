"""What every balancer holds: the injected ``random.Random`` and the endpoint set of the last ``update``.

The shared base of the policies in ``balancer.py`` and ``ring_hash.py``; a module of its own so that ``balancer.py``
(whose ``build_balancer`` needs ``RingHash``) and ``ring_hash.py`` both depend on it without importing each other.
The ``pick`` contract every subclass keeps is in ``balancer.py``'s docstring and its ``Balancer`` protocol.
"""

from __future__ import annotations

import random

from gateway.upstream.state import Endpoint

__all__ = ["BalancerBase"]


class BalancerBase:
    __slots__ = ("_endpoints", "_rng")

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._endpoints: tuple[Endpoint, ...] = ()

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._endpoints
