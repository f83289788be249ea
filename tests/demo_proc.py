"""Run ``meshgate demo`` as a user does, for the e2e tests: a real process tree on the demo's fixed ports.

``demo_stack(tmp_path, "--traffic")`` skips the test when a fixed port is taken (the demo's ports are the compose
topology's, they cannot move), starts the demo, waits for its banner and yields a ``Demo``; on exit it sends SIGTERM
and waits, and kills whatever this demo started and left behind should the test fail half-way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.demo.topology import PORTS
from tests.procs import ROOT, children

__all__ = ["BANNER", "Demo", "demo_stack", "http", "port_in_use"]

BANNER = "meshgate demo is up"
IDP = "http://127.0.0.1:7777"


@dataclass
class Demo:
    process: subprocess.Popen[bytes]
    output: Path
    data: Path
    started: dict[int, str]  # pid -> command line of every process the demo started

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def log(self, name: str) -> list[dict[str, Any]]:
        lines = (self.data / "logs" / f"{name}.log").read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def runs(self, part: str) -> bool:
        """Whether the demo started a process whose command line contains ``part``."""
        return any(part in cmdline for cmdline in self.started.values())

    def token(self, user: str, roles: str = "") -> str:
        with urllib.request.urlopen(f"{IDP}/token?sub={user}&roles={roles}", timeout=5) as answer:
            return str(answer.read().decode().strip())


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def http(
    url: str, token: str | None = None, method: str = "GET", body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    """``(status, headers with lower-case names, body)``; a connection failure raises ``OSError``."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, {k.lower(): v for k, v in answer.headers.items()}, answer.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


@contextlib.contextmanager
def demo_stack(tmp_path: Path, *args: str, timeout: float = 60.0) -> Iterator[Demo]:
    busy = [f"{what} {port}" for what, port in PORTS.items() if port_in_use(port)]
    if busy:
        pytest.skip(f"meshgate demo needs fixed ports, in use here: {', '.join(busy)}")
    data, output = tmp_path / "demo", tmp_path / "demo.out"
    with output.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "demo", "--data", str(data), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # its own process group, as in a terminal: a test may signal the group
        )
    demo = Demo(process, output, data, {})
    try:
        deadline = time.monotonic() + timeout
        while BANNER not in demo.text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the demo did not come up:\n{demo.text()}")
            time.sleep(0.2)
        demo.started = children(process.pid)
        yield demo
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid, cmdline in demo.started.items():  # only what this demo started, should it have left anything
            if _cmdline(pid) == cmdline:
                os.kill(pid, signal.SIGKILL)


def _cmdline(pid: int) -> str | None:
    try:
        return (Path(f"/proc/{pid}") / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None
