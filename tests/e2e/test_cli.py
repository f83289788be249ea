"""e2e: the ``meshgate`` command line as users run it: ``check``, usage errors, ``python -m gateway``, ``demo``."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.config.sources.file import read_config
from gateway.demo import UPSTREAMS
from tests.procs import ROOT

pytestmark = pytest.mark.e2e

EXAMPLE = ROOT / "examples" / "gateway.yaml"
CONSOLE_SCRIPT = Path(sys.executable).parent / "meshgate"  # installed next to this interpreter by `pip install -e .`
PROBLEM_LINE = re.compile(r"[^:\s][^:]*: \S.*")  # path (no colon; "line 2, column 1" for undecodable text): problem

BAD_CONFIG = """\
service: orders
listen: 127.0.0.1:8080
routes:
  - name: read
    match: {path_prefix: /orders, methods: [GET]}
    cluster: orders
  - name: write
    match: {path_prefix: /orders}
    split: [{cluster: ordrs, weight: 90}, {cluster: orders, weight: 10}]
    timeout: soon
clusters:
  - name: orders
    endpoints: [127.0.0.1:9001]
    lb: fastest
"""


def meshgate(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=30, cwd=cwd)


def test_check_accepts_the_example_config() -> None:
    result = meshgate("check", "-c", str(EXAMPLE))
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")


@pytest.mark.skipif(not CONSOLE_SCRIPT.exists(), reason=f"console script not installed at {CONSOLE_SCRIPT}")
def test_console_script_is_the_same_command() -> None:
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), "check", "-c", str(EXAMPLE)], capture_output=True, text=True, timeout=30
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")


def test_check_lists_every_problem_as_path_colon_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_CONFIG)
    result = meshgate("check", "-c", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert all(PROBLEM_LINE.fullmatch(line) for line in lines), lines
    assert [line.split(": ", 1)[0] for line in lines] == [
        "routes[1].split[0].cluster",
        "routes[1].timeout",
        "clusters[0].lb",
    ]
    assert lines[0].startswith('routes[1].split[0].cluster: unknown cluster "ordrs"')
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("service: [unclosed\n", "line 2, column 1"),  # not YAML: the location in the text is the path
        ("", "(document)"),
        ("- a list\n", "(document)"),
    ],
)
def test_check_rejects_undecodable_documents(tmp_path: Path, text: str, path: str) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(text)
    result = meshgate("check", "-c", str(config))
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert PROBLEM_LINE.fullmatch(line), line
    assert line.startswith(f"{path}: ")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("target", ["missing.yaml", "."])
def test_check_reports_an_unreadable_file(tmp_path: Path, target: str) -> None:
    path = tmp_path / target
    result = meshgate("check", "-c", str(path))
    assert result.returncode == 1
    assert re.fullmatch(rf"{re.escape(str(path))}: cannot read config file: .+\n", result.stderr), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["check"],
        ["check", "-c"],
        ["run"],
        ["run", "-c", str(EXAMPLE), "--workers", "0"],
        ["run", "-c", str(EXAMPLE), "--workers", "two"],
        ["check", "-c", str(EXAMPLE), "--unknown-flag"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = meshgate(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("usage: meshgate")
    assert "Traceback" not in result.stderr


def test_help_exits_0() -> None:
    result = meshgate("--help")
    assert result.returncode == 0
    for command in ("run", "check", "demo"):
        assert command in result.stdout


# --- demo -------------------------------------------------------------------------------------------------------


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}") / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def get(url: str) -> tuple[int, dict[str, str]] | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers)
    except (urllib.error.URLError, OSError):
        return None


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def test_demo_starts_the_stack_and_sigterm_stops_all_of_it(tmp_path: Path) -> None:
    snapshot = read_config(EXAMPLE)
    wanted = [(snapshot.listen.host, snapshot.listen.port), (snapshot.admin.host, snapshot.admin.port)]
    wanted += [("127.0.0.1", port) for _, port in UPSTREAMS]
    busy = [f"{host}:{port}" for host, port in wanted if port_in_use(host, port)]
    if busy:
        pytest.skip(f"meshgate demo needs fixed ports, in use here: {', '.join(busy)}")

    output = tmp_path / "demo.out"
    env = {**os.environ, "MESHGATE_DEMO_LOG": str(tmp_path / "demo.log"), "PYTHONUNBUFFERED": "1"}
    with output.open("wb") as out:
        demo = subprocess.Popen(
            [sys.executable, "-m", "gateway", "demo"], stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env
        )
    started: set[int] = set()
    try:
        # The banner is printed once the gateway is ready, right before the demo starts watching for SIGTERM.
        wait_until(lambda: demo.poll() is not None or "Ctrl-C stops everything" in output.read_text(), 30, "banner")
        assert demo.poll() is None, output.read_text()
        answer = get(f"http://{snapshot.listen}/api/v1/things")
        assert answer is not None
        status, headers = answer
        assert status == 200
        assert headers["x-upstream-instance"] in {name for name, _ in UPSTREAMS}
        ready = get(f"http://{snapshot.admin}/readyz")
        assert ready is not None
        assert ready[0] == 200
        started = children(demo.pid)
        assert len(started) == len(UPSTREAMS) + 1  # the upstreams and the gateway

        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=30) == 0
        wait_until(lambda: not any(alive(pid) for pid in started), 5, "every demo process to exit")
        assert get(f"http://{snapshot.listen}/api/v1/things") is None  # nothing answers any more
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        for pid in started:  # only processes this demo started, should the test fail half-way
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
