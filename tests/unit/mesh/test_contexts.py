"""The mesh listener resumes no TLS session: every connection's client certificate is verified afresh."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest

from gateway.mesh.contexts import bound_server_context
from tests.certs import make_ca


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_second_connection_cannot_resume_the_first_session(version: ssl.TLSVersion, tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "mesh")
    server_cert = ca.issue("payments")
    client_cert = ca.issue("orders")
    server = bound_server_context("strict")
    server.load_cert_chain(server_cert.cert_file, server_cert.key_file)
    server.load_verify_locations(cafile=ca.cert_file)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cafile=ca.cert_file)
    client.load_cert_chain(client_cert.cert_file, client_cert.key_file)
    client.maximum_version = version
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            with server.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
                tls.sendall(b"x")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    session = None
    reused = []
    for _ in range(2):
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            client.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls,
        ):
            tls.sendall(b"x")
            tls.recv(1)
            reused.append(tls.session_reused)
            session = tls.session
    thread.join(5)
    listener.close()
    assert reused == [False, False]
