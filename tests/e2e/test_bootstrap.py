"""e2e: a real ``meshgate run`` / ``meshgate check`` on a bootstrap file, against the fake config service.

The not-ready start (no service, no cache: admin up, /readyz 503, proxy 503 ``not_ready``) and the turn to ready
when the service comes back, which the fleet test with the real service cannot stage.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.fake_configservice import SERVICE, TOKEN, FakeService, pushed
from tests.procs import ROOT, eventually, free_port, stop, wait_http

pytestmark = pytest.mark.e2e


def write_bootstrap(tmp_path: Path, url: str, listen: int, admin: int, **section: Any) -> Path:
    (tmp_path / "gw.token").write_text(TOKEN + "\n")
    document = {
        "service": SERVICE,
        "listen": f"127.0.0.1:{listen}",
        "admin": f"127.0.0.1:{admin}",
        "config_service": {"url": url, "token_file": "gw.token", **section},
    }
    path = tmp_path / "bootstrap.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def spawn(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=dict(os.environ),
        )


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_check_validates_a_bootstrap_alone(tmp_path: Path) -> None:
    path = write_bootstrap(tmp_path, "http://127.0.0.1:7000", 8080, 9901)
    done = check(path)
    assert (done.returncode, done.stdout, done.stderr) == (
        0,
        "ok\n",
        "note: a bootstrap file: the routes and the rest come from http://127.0.0.1:7000\n",
    )
    (tmp_path / "gw.token").unlink()
    done = check(path)
    message = f"config_service.token_file: cannot read {tmp_path / 'gw.token'}: No such file or directory\n"
    assert (done.returncode, done.stderr) == (1, message)
    path.write_text(yaml.safe_dump({"service": SERVICE, "config_service": {"url": "x", "token_file": ""}}))
    done = check(path)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        'config_service.url: invalid URL "x" (expected http://host:port or https://host:port)',
        "config_service.token_file: must not be empty",
    ]


async def test_not_ready_without_service_or_cache_then_ready_when_a_version_arrives(
    tmp_path: Path, upstream_a: int
) -> None:
    service = FakeService(free_port())
    listen, admin = free_port(), free_port()
    path = write_bootstrap(tmp_path, service.url, listen, admin, poll_wait="2s")
    process = spawn(path, tmp_path / "gw.log")
    try:
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{admin}/healthz", 15.0, process)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{admin}/readyz") as response:
                assert response.status == 503
                body = await response.json()
            assert (body["ready"], body["source"], body["version"]) == (False, None, None)
            async with session.get(f"http://127.0.0.1:{listen}/a/x") as response:
                assert response.status == 503
                assert response.headers["Retry-After"] == "1"
                assert (await response.json())["error"] == "not_ready"

            service.push(pushed("a", cluster=f"127.0.0.1:{upstream_a}"))
            await service.start()

            async def ready() -> Any:
                async with session.get(f"http://127.0.0.1:{admin}/readyz") as answer:
                    return await answer.json() if answer.status == 200 else None

            body = await eventually(ready, 20.0, "/readyz 200 once the service answers")
            assert body == {"status": "ready", "ready": True, "source": "config_service", "version": 1}
            async with session.get(f"http://127.0.0.1:{listen}/a/x") as response:
                assert response.status == 200
            async with session.get(f"http://127.0.0.1:{admin}/config") as response:
                served = await response.json()
            assert (served["version"], served["source"]) == (1, f"config_service:{service.url}")
            async with session.get(f"http://127.0.0.1:{admin}/metrics") as response:
                assert "meshgate_config_version 1.0" in await response.text()
    finally:
        assert stop(process) == 0
        await service.stop()
