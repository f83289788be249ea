"""A real ``meshgate configservice`` process for e2e tests, with known tokens, and a small typed client for it.

``config_service(data_dir)`` writes a tokens file (one admin, one gateway token), starts the service on a free
port, waits for ``/healthz`` and stops it by PID on exit; ``restart()`` brings it back on the same port and data.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.procs import ROOT, free_port, stop, wait_http

__all__ = ["ADMIN_TOKEN", "GATEWAY_TOKEN", "ConfigService", "config_service"]

ADMIN_TOKEN = "admin-token-for-tests-0123456789abcdef"
GATEWAY_TOKEN = "gateway-token-for-tests-0123456789abcdef"


@dataclass
class ConfigService:
    port: int
    data: Path
    log_path: Path
    extra_args: Sequence[str] = ()
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def tokens_file(self) -> Path:
        return self.data.parent / f"{self.data.name}-tokens.yaml"

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "configservice",
                    "--data",
                    str(self.data),
                    "--listen",
                    f"127.0.0.1:{self.port}",
                    "--tokens",
                    str(self.tokens_file),
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        try:
            wait_http(f"{self.url}/healthz", process=self.process)
        except BaseException:
            self.stop()  # never leave a half-started service behind a failed fixture
            raise

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            stop(self.process)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def call(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        token: str = ADMIN_TOKEN,
        raw: bytes | None = None,
        content_type: str = "application/gzip",
    ) -> tuple[int, dict[str, Any]]:
        """One request; the JSON answer (``{}`` for an empty body), whatever the status."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        request.add_header("Authorization", f"Bearer {token}")
        if raw is not None:
            request.add_header("Content-Type", content_type)
        elif data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, text = response.status, response.read()
        except urllib.error.HTTPError as error:
            with error:  # its socket is closed with it (a ResourceWarning otherwise)
                status, text = error.code, error.read()
        return status, (json.loads(text) if text.strip() else {})

    def push(self, service: str, config: dict[str, Any]) -> int:
        status, answer = self.call("PUT", f"/v1/services/{service}/config", config)
        assert status in (200, 201), (status, answer)
        return int(answer["version"])


@contextmanager
def config_service(
    data: Path,
    *,
    extra_args: Sequence[str] = (),
    port: int | None = None,
    tokens: Sequence[dict[str, str]] = (),
) -> Iterator[ConfigService]:
    """``tokens``: more entries for the tokens file (e.g. gateway tokens bound to a ``service``)."""
    data.mkdir(parents=True, exist_ok=True)
    service = ConfigService(port or free_port(), data, data.parent / f"{data.name}.log", extra_args)
    tokens_doc = {
        "tokens": [
            {"name": "ops", "token": ADMIN_TOKEN, "role": "admin"},
            {"name": "fleet", "token": GATEWAY_TOKEN, "role": "gateway"},
            *tokens,
        ]
    }
    service.tokens_file.write_text(yaml.safe_dump(tokens_doc))
    service.start()
    try:
        yield service
    finally:
        service.stop()
