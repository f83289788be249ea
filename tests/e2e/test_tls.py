"""TLS end to end, with real processes and certificates made at test time (``tests/certs.py``).

The listener: a verifying https client is served (and the upstream is told ``x-forwarded-proto: https``); TLS 1.1
and plain HTTP are refused at the handshake; a certificate rotated on disk is served to new handshakes without a
restart, while a broken pair is logged and the old certificate kept.

Upstreams: ``examples/upstream.py --tls-cert ...`` behind clusters with ``tls``: verified against the configured CA
(a wrong CA is a 502 with a log line naming the TLS failure), ``server_name`` sent as SNI and checked against the
certificate, a client certificate presented to an upstream that requires one, ``insecure_skip_verify`` logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from cryptography import x509

from tests.certs import CA, Issued, make_ca
from tests.procs import Gateway, eventually, gateway, log_events, upstream

pytestmark = pytest.mark.e2e


@dataclass
class Stack:
    gw: Gateway
    ca: CA
    listener: Issued
    upstream_ports: dict[str, int]

    @property
    def https(self) -> str:
        return f"https://127.0.0.1:{self.gw.listen}"


def _trusting(ca: CA) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca.cert_file))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("tls")
    ca, other_ca = make_ca(base / "ca"), make_ca(base / "other-ca", "other-ca")
    listener = ca.issue("gateway", directory=base / "listener")
    by_ip = ca.issue("upstream-ip", dns=(), ips=("127.0.0.1",))
    by_name = ca.issue("upstream-name", dns=("orders.internal",), ips=())
    mutual = ca.issue("upstream-mtls")
    client = ca.issue("gw-client", server=False)
    trust = _trusting(ca)
    by_name_trust = _trusting(ca)
    by_name_trust.check_hostname = False  # readiness only: its certificate names orders.internal, not 127.0.0.1
    mtls_args = ("--tls-cert", str(mutual.cert_file), "--tls-key", str(mutual.key_file))
    mtls_trust = _trusting(ca)
    mtls_trust.load_cert_chain(client.cert_file, client.key_file)
    with contextlib.ExitStack() as processes:
        plain = processes.enter_context(upstream("plain"))
        ip = processes.enter_context(
            upstream(
                "ip",
                extra_args=("--tls-cert", str(by_ip.cert_file), "--tls-key", str(by_ip.key_file)),
                tls_context=trust,
            )
        )
        name = processes.enter_context(
            upstream(
                "name",
                extra_args=("--tls-cert", str(by_name.cert_file), "--tls-key", str(by_name.key_file)),
                tls_context=by_name_trust,
            )
        )
        mtls = processes.enter_context(
            upstream("mtls", extra_args=(*mtls_args, "--tls-client-ca", str(ca.cert_file)), tls_context=mtls_trust)
        )
        ca_file = os.path.relpath(ca.cert_file, base)  # relative: resolved against the config file's directory
        clusters: list[dict[str, Any]] = [
            {"name": "plain", "endpoints": [f"127.0.0.1:{plain}"]},
            {
                "name": "verified",
                "endpoints": [f"127.0.0.1:{ip}"],
                "tls": {"ca_file": ca_file},
                "health_check": {"path": "/healthz", "interval": "500ms", "unhealthy_threshold": 1},
            },
            {"name": "wrong-ca", "endpoints": [f"127.0.0.1:{ip}"], "tls": {"ca_file": str(other_ca.cert_file)}},
            {"name": "insecure", "endpoints": [f"127.0.0.1:{ip}"], "tls": {"insecure_skip_verify": True}},
            {
                "name": "named",
                "endpoints": [f"127.0.0.1:{name}"],
                "tls": {"ca_file": ca_file, "server_name": "orders.internal"},
            },
            {"name": "unnamed", "endpoints": [f"127.0.0.1:{name}"], "tls": {"ca_file": ca_file}},
            {
                "name": "mutual",
                "endpoints": [f"127.0.0.1:{mtls}"],
                "tls": {"ca_file": ca_file, "cert_file": str(client.cert_file), "key_file": str(client.key_file)},
            },
            {"name": "no-client-cert", "endpoints": [f"127.0.0.1:{mtls}"], "tls": {"ca_file": ca_file}},
        ]
        routes = [
            {"name": c["name"], "match": {"path_prefix": f"/{c['name']}/"}, "cluster": c["name"]} for c in clusters
        ]
        config = {
            "service": "test",
            "tls": {"cert_file": "listener/gateway.pem", "key_file": "listener/gateway.key"},
            "routes": routes,
            "clusters": clusters,
        }
        gw = processes.enter_context(gateway(base, config))
        yield Stack(gw, ca, listener, {"plain": plain, "ip": ip, "name": name, "mtls": mtls})


async def _get(stack: Stack, path: str) -> tuple[int, dict[str, Any]]:
    connector = aiohttp.TCPConnector(ssl=_trusting(stack.ca))
    async with aiohttp.ClientSession(connector=connector) as session, session.get(stack.https + path) as response:
        return response.status, await response.json()


async def _served_serial(stack: Stack) -> int:
    """The serial number of the certificate a new handshake with the listener gets."""
    _, writer = await asyncio.open_connection("127.0.0.1", stack.gw.listen, ssl=_trusting(stack.ca))
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).serial_number
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


# --- the listener ---------------------------------------------------------------------------------------------------


async def test_https_listener_serves_a_verifying_client(stack: Stack) -> None:
    status, echo = await _get(stack, "/plain/anything")
    assert (status, echo["instance"]) == (200, "plain")
    assert echo["headers"]["x-forwarded-proto"] == "https"
    _, writer = await asyncio.open_connection("127.0.0.1", stack.gw.listen, ssl=_trusting(stack.ca))
    tls = writer.get_extra_info("ssl_object")
    assert tls.version() in ("TLSv1.2", "TLSv1.3")
    writer.close()


async def test_tls_1_1_is_refused(stack: Stack) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():  # a deliberately outdated client: Python warns about TLS 1.0/1.1
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # the client side would refuse TLS 1.1 on its own otherwise
    # The server answers a TLS 1.1 hello with a protocol_version alert; asyncio may report it as a reset.
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await asyncio.open_connection("127.0.0.1", stack.gw.listen, ssl=old)
    old.maximum_version = ssl.TLSVersion.TLSv1_2  # the control: the same client, allowed TLS 1.2, gets in
    _, writer = await asyncio.open_connection("127.0.0.1", stack.gw.listen, ssl=old)
    assert writer.get_extra_info("ssl_object").version() == "TLSv1.2"
    writer.close()


async def test_plain_http_to_the_tls_port_is_closed_cleanly(stack: Stack) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.gw.listen)
    writer.write(b"GET /plain/anything HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        try:
            answer = await reader.read()
        except ConnectionResetError:
            answer = b""
    writer.close()
    assert not answer.startswith(b"HTTP/")  # no HTTP answer: the handshake failed and the connection closed
    status, _ = await _get(stack, "/plain/anything")  # and the listener goes on serving
    assert status == 200
    assert not [e for e in stack.gw.logs() if e.get("level") == "error"]


async def test_a_rotated_certificate_is_served_without_a_restart(stack: Stack) -> None:
    first = await _served_serial(stack)
    assert first == stack.listener.serial
    # A keep-alive connection made with the old certificate outlives the rotation.
    connector = aiohttp.TCPConnector(ssl=_trusting(stack.ca), limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(stack.https + "/plain/anything") as response:
            assert response.status == 200
        directory = stack.listener.cert_file.parent
        rotated = stack.ca.issue("gateway", directory=directory / "next")
        # Key first, then certificate, each by rename (as cert-manager or certbot hooks do). In between, the pair
        # on disk may not match for a moment: that poll logs a failed reload and the next one succeeds.
        os.replace(rotated.key_file, stack.listener.key_file)
        os.replace(rotated.cert_file, stack.listener.cert_file)

        async def serial_is_new() -> bool:
            return await _served_serial(stack) == rotated.serial

        await eventually(serial_is_new, 5.0, "new handshakes to get the rotated certificate")
        reloaded = await _logged(stack.gw, "tls_certificate_reloaded", serial=format(rotated.serial, "X"))
        assert reloaded
        async with session.get(stack.https + "/plain/anything") as response:
            assert response.status == 200
        assert stack.gw.process.poll() is None

        # A broken pair (a key that belongs to another certificate): logged, and the rotated one keeps serving.
        stray = stack.ca.issue("stray", directory=directory / "stray")
        os.replace(stray.key_file, stack.listener.key_file)

        async def reload_failed() -> bool:
            return bool(log_events(stack.gw, "tls_reload_failed"))

        await eventually(reload_failed, 5.0, "tls_reload_failed")
        failure = log_events(stack.gw, "tls_reload_failed")[-1]
        assert failure["errors"] == [
            {"path": "tls.key_file", "message": f"does not match the certificate in {stack.listener.cert_file}"}
        ]
        assert await _served_serial(stack) == rotated.serial
        status, _ = await _get(stack, "/plain/anything")
        assert status == 200


async def _logged(gw: Gateway, event: str, **fields: object) -> list[dict[str, Any]]:
    """The gateway's ``event`` lines with these field values, waiting for one: lines reach the file in batches."""

    async def found() -> list[dict[str, Any]]:
        return [e for e in log_events(gw, event) if all(e.get(k) == v for k, v in fields.items())]

    return await eventually(found, 5.0, f"a {event} log line with {fields}")


# --- upstreams ------------------------------------------------------------------------------------------------------


async def test_upstream_tls_verified_against_the_configured_ca(stack: Stack) -> None:
    status, echo = await _get(stack, "/verified/anything")
    assert (status, echo["instance"]) == (200, "ip")
    assert echo["tls"]["version"] in ("TLSv1.2", "TLSv1.3")
    assert echo["tls"]["client_cn"] is None  # no client certificate configured: none presented
    await asyncio.sleep(1.2)  # health checks go over https too: two rounds, and none failed
    assert not [e for e in log_events(stack.gw, "health_check_transition") if e["upstream"] == "verified"]


async def test_a_wrong_ca_is_a_502_with_the_tls_failure_logged(stack: Stack) -> None:
    status, body = await _get(stack, "/wrong-ca/anything")
    assert (status, body["error"]) == (502, "upstream_unavailable")
    failures = await _logged(stack.gw, "upstream_tls_failed", upstream="wrong-ca")
    assert failures[-1]["error"] == "certificate verify failed: unable to get local issuer certificate"
    assert failures[-1]["endpoint"] == f"127.0.0.1:{stack.upstream_ports['ip']}"


async def test_insecure_skip_verify_connects_and_is_logged(stack: Stack) -> None:
    status, echo = await _get(stack, "/insecure/anything")
    assert (status, echo["instance"]) == (200, "ip")
    warnings = log_events(stack.gw, "upstream_tls_verification_disabled")
    assert [(e["level"], e["upstream"]) for e in warnings] == [("warning", "insecure")]


async def test_server_name_is_sent_and_verified(stack: Stack) -> None:
    status, echo = await _get(stack, "/named/anything")
    assert (status, echo["instance"]) == (200, "name")
    assert echo["tls"]["sni"] == "orders.internal"
    # Without server_name the endpoint's IP is checked, and this certificate names only orders.internal.
    status, body = await _get(stack, "/unnamed/anything")
    assert (status, body["error"]) == (502, "upstream_unavailable")
    failure = (await _logged(stack.gw, "upstream_tls_failed", upstream="unnamed"))[-1]
    assert failure["error"].startswith("certificate verify failed: IP address mismatch")


async def test_a_client_certificate_is_presented_when_configured(stack: Stack) -> None:
    status, echo = await _get(stack, "/mutual/anything")
    assert (status, echo["instance"]) == (200, "mtls")
    assert echo["tls"]["client_cn"] == "gw-client"
    status, body = await _get(stack, "/no-client-cert/anything")  # this upstream requires one
    assert (status, body["error"]) == (502, "upstream_unavailable")
