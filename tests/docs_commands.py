"""Find the commands in the docs and run them, page by page, as a reader would (``tests/e2e/test_docs.py``).

The convention for commands in ``README.md`` and ``docs/*.md``:

- A runnable command is a line starting with ``$ `` inside a fenced ```` ```console ```` block. A command whose line
  ends with ``\\`` continues on the next line; a command with a here-document (``<<'EOF'``) continues up to its
  terminator line. ``# text`` after a command is a comment, as in the shell.
- Every other line of a console block is example output: shown to the reader, not compared.
- Synopses and usage lines (``[--optional]`` brackets, ``FILE`` placeholders) go in ```` ```text ```` blocks, never
  in console blocks; what a console block shows must be a concrete command that runs as written.
- Commands run in order, one bash process per page (``set -uo pipefail``; the first command that exits non-zero
  stops the page and is reported with its page, line and output), in a fresh temporary directory that has the
  repository's ``examples/``, ``policy/``, ``compose/``, ``scripts/`` and ``grafana/`` at the same relative paths,
  with the repository's python (and its ``meshgate``) first on ``PATH``. Variables and ``cd`` carry from one command
  to the next, as in a terminal.
- Server commands (``meshgate demo``, ``meshgate configservice``, ``meshgate run``, and the same through
  ``python3 -m gateway``) are started in the background instead, in the page's current directory, and waited for:
  the demo until it prints ``meshgate demo is up``, the config service until its ``/healthz`` answers, a gateway
  until its ``/readyz`` does. They run until the end of the page and are then stopped (SIGTERM, then SIGKILL). A
  server command is one simple command: no ``&&``, pipes or variable assignments in front.
- Any other command that ends with ``&`` runs in the background of the page's shell, as in a terminal, and is
  stopped (SIGTERM) at the end of the page; the page waits for what it needs itself (``until curl ...``).
- Not run: ``docker compose ...`` (no Docker engine where the tests run; ``tests/integration/test_compose_*.py``
  check the compose files statically) and ``./scripts/setup`` / ``./scripts/test`` (CI runs exactly those two).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gateway.demo.topology import OPTIONAL_PORTS, PORTS
from tests.procs import children

__all__ = [
    "BANNER",
    "LINKED",
    "ROOT",
    "Command",
    "PageResult",
    "Server",
    "commands",
    "fenced_blocks",
    "pages",
    "prepare_workdir",
    "run_page",
]

ROOT = Path(__file__).resolve().parents[1]
BANNER = "meshgate demo is up"
# What a page's working directory holds, at the same relative paths as in the repository.
LINKED = ("examples", "policy", "compose", "scripts", "grafana")
COMMAND_TIMEOUT = 90.0  # seconds for one command (long-polls in the docs wait a few seconds at most)
READY_TIMEOUT = 90.0

_FENCE = re.compile(r"^```(\S*)\s*$")
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\1")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_SERVERS = ("demo", "configservice", "run")


@dataclass(frozen=True, slots=True)
class Server:
    """How to know a server command is up: ``banner`` text in its output, a ``url`` that answers 200, or neither
    (alive after a few seconds); and the fixed ports it needs free."""

    banner: str | None
    url: str | None
    ports: tuple[int, ...]
    config: str | None = None  # `meshgate run -c FILE`: FILE, read when the server starts for its admin address


@dataclass(frozen=True, slots=True)
class Command:
    page: str  # path relative to the repository
    line: int  # 1-based line of the `$ ` line
    text: str  # the command as bash reads it (continuation and here-document lines included)
    server: Server | None = None
    not_runnable: str | None = None  # why the runner does not run it

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


@dataclass
class PageResult:
    page: str
    ran: list[Command] = field(default_factory=list)
    not_runnable: list[Command] = field(default_factory=list)
    failure: str | None = None  # page:line, the command, why, and its output
    outputs: dict[int, str] = field(default_factory=dict)  # line -> output of each command that ran


def pages() -> list[Path]:
    """Every page with commands: README.md and docs/*.md."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def fenced_blocks(text: str) -> Iterator[tuple[str, int, list[str]]]:
    """``(info string, line number of the first content line, lines)`` of each fenced block."""
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        end = index + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        yield opening.group(1), index + 2, lines[index + 1 : end]
        index = end + 1


def commands(path: Path, root: Path = ROOT) -> list[Command]:
    """The ``$ `` commands of ``path``'s console blocks, in page order, classified."""
    page = str(path.relative_to(root))
    found: list[Command] = []
    for info, first, lines in fenced_blocks(path.read_text(encoding="utf-8")):
        if info != "console":
            continue
        index = 0
        while index < len(lines):
            line = lines[index]
            if not line.startswith("$ "):
                index += 1
                continue
            number, parts = first + index, [line[2:]]
            index += 1
            while parts[-1].endswith("\\") and index < len(lines):
                parts.append(lines[index])
                index += 1
            heredoc = _HEREDOC.search("\n".join(parts))
            if heredoc is not None:
                terminator = heredoc.group(2)
                while index < len(lines):
                    parts.append(lines[index])
                    index += 1
                    if parts[-1].strip() == terminator:
                        break
            found.append(_classify(page, number, "\n".join(parts)))
    return found


def _classify(page: str, line: int, text: str) -> Command:
    words = _words(text)
    if words[:1] == ["docker"]:
        return Command(page, line, text, not_runnable="docker: no Docker engine where the tests run")
    if any(word in ("./scripts/setup", "./scripts/test") for word in words):
        return Command(page, line, text, not_runnable="./scripts/setup and ./scripts/test: CI runs exactly these")
    return Command(page, line, text, server=_server(words))


def _words(text: str) -> list[str]:
    try:
        words = shlex.split(text.split("\n", 1)[0].rstrip("\\"), comments=True)
    except ValueError:
        return []
    while words and _ASSIGNMENT.match(words[0]):
        words.pop(0)
    return words


def _server(words: list[str]) -> Server | None:
    if words[:1] == ["meshgate"]:
        args = words[1:]
    elif len(words) >= 3 and re.fullmatch(r"python3?(\.\d+)?", words[0]) and words[1:3] == ["-m", "gateway"]:
        args = words[3:]
    else:
        return None
    if not args or args[0] not in _SERVERS or any(word in ("&&", "||", "|", ";") for word in args):
        return None
    if args[0] == "demo":
        return Server(BANNER, None, tuple(PORTS.values()))
    if args[0] == "configservice":
        listen = _option(args, "--listen") or "127.0.0.1:7000"
        return Server(None, f"http://{_local(listen)}/healthz", (int(listen.rsplit(":", 1)[1]),))
    config = _option(args, "-c") or _option(args, "--config")
    if config is None:
        return Server(None, None, ())
    if not (ROOT / config).is_file():  # written by an earlier command of the page: read when the server starts
        return Server(None, None, (), config)
    url, ports = _gateway_addresses(ROOT / config)
    return Server(None, url, ports, config)


def _gateway_addresses(config: Path) -> tuple[str, tuple[int, ...]]:
    """A gateway config's ``/readyz`` URL and its two ports."""
    document = yaml.safe_load(config.read_text()) or {}
    admin, listen = str(document.get("admin", "127.0.0.1:9901")), str(document.get("listen", "127.0.0.1:8080"))
    return f"http://{_local(admin)}/readyz", tuple(int(address.rsplit(":", 1)[1]) for address in (listen, admin))


def _option(args: Sequence[str], name: str) -> str | None:
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _local(address: str) -> str:
    host, port = address.rsplit(":", 1)
    return f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"


def needed_ports(found: Sequence[Command]) -> list[int]:
    """The fixed ports a page's commands need free: its servers', and the demo's optional parts it talks to."""
    ports: set[int] = set()
    for command in found:
        if command.server is not None:
            ports.update(command.server.ports)
    if any(command.server is not None and command.server.banner for command in found):
        text = "\n".join(command.text for command in found)
        ports.update(port for port in OPTIONAL_PORTS.values() if f"127.0.0.1:{port}" in text)
        if "127.0.0.1:16686" in text:  # the trace store starts only when both its ports are free
            ports.update((4318, 16686))
    return sorted(ports)


def prepare_workdir(workdir: Path) -> dict[str, str]:
    """Fill ``workdir`` as the docs expect it; return the environment the page's commands run with."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        (workdir / name).symlink_to(ROOT / name, target_is_directory=True)
    bin_dir = workdir.parent / f"{workdir.name}-bin"
    bin_dir.mkdir(exist_ok=True)
    python_dir = Path(sys.executable).parent
    for name in ("python", "python3"):
        (bin_dir / name).symlink_to(sys.executable)
    meshgate = bin_dir / "meshgate"
    meshgate.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m gateway "$@"\n')
    meshgate.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTEST_", "COV_"))}
    env["PATH"] = os.pathsep.join([str(bin_dir), str(python_dir), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"

    return env


def run_page(path: Path, workdir: Path, found: Sequence[Command] | None = None) -> PageResult:
    """Run ``path``'s commands in ``workdir`` (see the module docstring); stop at the first failure."""
    found = list(commands(path) if found is None else found)
    result = PageResult(str(path.relative_to(ROOT)))
    env = prepare_workdir(workdir)
    outputs = workdir.parent / f"{workdir.name}-out"
    outputs.mkdir(exist_ok=True)
    read_fd, write_fd = os.pipe()
    shell = subprocess.Popen(
        ["bash", "--noprofile", "--norc", "-s"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=workdir,
        env=env,
        pass_fds=(write_fd,),
        start_new_session=True,
    )
    os.close(write_fd)
    servers: list[tuple[Command, subprocess.Popen[bytes]]] = []
    cwd = workdir
    assert shell.stdin is not None
    try:
        shell.stdin.write(b"set -uo pipefail\n")
        for command in found:
            if command.not_runnable is not None:
                result.not_runnable.append(command)
                continue
            out = outputs / f"{command.line}.out"
            if command.server is not None:
                server = command.server
                if server.url is None and server.config is not None and (cwd / server.config).is_file():
                    url, ports = _gateway_addresses(cwd / server.config)
                    server = Server(None, url, ports, server.config)
                process = _start_server(command, cwd, env, out)
                servers.append((command, process))
                problem = _wait_ready(server, process, out)
            else:
                script = f"{{ {command.text}\n}} >{shlex.quote(str(out))} 2>&1 </dev/null\n"
                script += f'printf \'%s %s\\n\' "$?" "$PWD" >&{write_fd}\n'
                try:
                    shell.stdin.write(script.encode())
                    shell.stdin.flush()
                except BrokenPipeError:
                    status, problem = -1, "the shell exited before this command (see the previous one)"
                else:
                    status, cwd, problem = _status(read_fd, cwd)
                if problem is None and status != 0:
                    problem = f"exit status {status}"
            result.outputs[command.line] = out.read_text(errors="replace") if out.exists() else ""
            if problem is not None:
                result.failure = (
                    f"{command.where}: {problem}\n$ {command.text}\n--- output ---\n{result.outputs[command.line]}"
                )
                break
            result.ran.append(command)
    finally:
        with contextlib.suppress(BrokenPipeError):
            # Background jobs a command started with `&` end with the page.
            shell.stdin.write(b"jobs -p | xargs -r kill 2>/dev/null; wait\n")
            shell.stdin.close()
        try:
            shell.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(shell.pid, signal.SIGKILL)
            shell.wait()
        os.close(read_fd)
        for _command, process in reversed(servers):
            _stop(process)
    return result


def _start_server(command: Command, cwd: Path, env: dict[str, str], out: Path) -> subprocess.Popen[bytes]:
    with out.open("wb") as log:
        return subprocess.Popen(
            ["bash", "--noprofile", "--norc", "-c", "exec " + command.text + "\n"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )


def _wait_ready(server: Server, process: subprocess.Popen[bytes], out: Path) -> str | None:
    started = time.monotonic()
    while time.monotonic() - started < READY_TIMEOUT:
        if process.poll() is not None:
            return f"the server exited with status {process.returncode} before it was ready"
        if server.banner is not None:
            if server.banner in out.read_text(errors="replace"):
                return None
        elif server.url is not None:
            try:
                with urllib.request.urlopen(server.url, timeout=1) as answer:
                    if answer.status == 200:
                        return None
            except (urllib.error.URLError, OSError):
                pass
        elif time.monotonic() - started > 3:
            return None
        time.sleep(0.2)
    what = server.banner or server.url or "alive"
    return f"not ready after {READY_TIMEOUT:.0f}s (waiting for {what!r})"


def _status(read_fd: int, cwd: Path) -> tuple[int, Path, str | None]:
    """The status line bash writes after each command: ``(exit status, $PWD, problem)``."""
    data = b""
    deadline = time.monotonic() + COMMAND_TIMEOUT
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            return -1, cwd, f"still running after {COMMAND_TIMEOUT:.0f}s"
        ready, _, _ = select.select([read_fd], [], [], left)
        if ready:
            chunk = os.read(read_fd, 4096)
            if not chunk:
                return -1, cwd, "the shell exited (an `exit` in the command, or a syntax error)"
            data += chunk
    status, _, directory = data.decode().strip().partition(" ")
    return int(status), Path(directory), None


def _stop(process: subprocess.Popen[bytes]) -> None:
    left = children(process.pid)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    for pid, cmdline in left.items():  # only what this server started, should it have left anything behind
        try:
            if (Path(f"/proc/{pid}") / "cmdline").read_bytes().replace(b"\0", b" ").decode() == cmdline:
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
