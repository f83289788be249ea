"""e2e: two config-service replicas on one real etcd; a push through one reaches a gateway watching the other.

This is what the etcd store is for: several replicas behind one address, any of them taking writes, every
watcher on every replica woken by etcd's watch (not by polling). The gateway here long-polls replica B only.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.configservice_proc import GATEWAY_TOKEN, ConfigService, config_service
from tests.etcd_proc import EtcdServer, etcd_server
from tests.procs import eventually, gateway

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("etcd") is None, reason="needs the Debian etcd-server package (scripts/setup)"),
]


def pushed(port: int, prefix: str) -> dict[str, Any]:
    return {
        "routes": [
            {"name": "r", "match": {"path_prefix": prefix}, "cluster": "a", "rewrite": {"prefix": "/anything/"}}
        ],
        "clusters": [{"name": "a", "endpoints": [f"127.0.0.1:{port}"]}],
    }


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with etcd_server() as server:
        yield server


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, etcd: EtcdServer) -> Iterator[tuple[ConfigService, ...]]:
    tmp = tmp_path_factory.mktemp("replicas")
    args = ("--store", "etcd", "--etcd-endpoints", etcd.endpoint)
    with config_service(tmp / "a", extra_args=args) as a, config_service(tmp / "b", extra_args=args) as b:
        yield a, b


async def test_a_push_through_one_replica_reaches_a_gateway_on_the_other(
    replicas: tuple[ConfigService, ConfigService], tmp_path: Path, upstream_a: int
) -> None:
    a, b = replicas
    assert a.push("shop", pushed(upstream_a, "/one/")) == 1
    token = tmp_path / "gw.token"
    token.write_text(GATEWAY_TOKEN)
    boot = {"service": "shop", "config_service": {"url": b.url, "token_file": str(token), "gateway_id": "gw-b"}}
    with gateway(tmp_path, boot) as gw:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{gw.url}/one/x") as response:
                assert response.status == 200
            started = time.monotonic()
            assert a.push("shop", pushed(upstream_a, "/two/")) == 2  # written through A only

            async def served() -> bool:
                async with session.get(f"{gw.url}/two/x") as response:
                    return response.status == 200

            await eventually(served, 2.0, "the gateway on replica B serving version 2")
            assert time.monotonic() - started < 2.0

        # Both replicas see the gateway's report, whichever one it polls.
        async def reported() -> bool:
            return all(
                any(
                    g["id"] == "gw-b" and g["applied_version"] == 2
                    for g in replica.call("GET", "/v1/gateways")[1]["gateways"]
                )
                for replica in (a, b)
            )

        await eventually(reported, 20.0, "both replicas listing gw-b at version 2")
