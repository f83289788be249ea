"""The peer identity read from ``getpeercert()``."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.mesh.peer import peer_identity

ORDERS = "spiffe://meshgate.local/service/orders"


@pytest.mark.parametrize(
    ("cert", "expected"),
    [
        (None, ""),  # no client certificate
        ({}, ""),  # a certificate that was not verified
        ({"subjectAltName": (("DNS", "orders"),)}, ""),
        ({"subjectAltName": (("URI", "https://orders"), ("URI", ORDERS))}, ORDERS),
        ({"subjectAltName": (("DNS", "x"), ("URI", ORDERS), ("URI", "spiffe://meshgate.local/service/b"))}, ORDERS),
    ],
)
def test_peer_identity(cert: dict[str, Any] | None, expected: str) -> None:
    assert peer_identity(cert) == expected
